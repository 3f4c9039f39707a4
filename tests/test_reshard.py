"""Checkpoints load under another layout (issue: checkpoints, must-show 1).

A run saved at one (tp, pp, cp, dp, ZeRO stage) layout continues at another: its losses equal those of
the run that never changed layout to 1e-5 relative (float32), and the data loader continues at the same
global sample. The global batch (micro_batch_size * grad_accum * dp) is kept equal across the switch.
"""
import json
import shutil
from pathlib import Path

import pytest

from parallel_harness import run_ranks

STEPS = 4
SAVED = 2  # the checkpoint the switched run resumes from


def _recipe(run_dir, parallel, train):
    from longtrain.trainer.config import recipe_from_dict

    return recipe_from_dict({
        "name": "reshard", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1}},
        "data": {"task": "passkey", "seq_len": 32, "passkey": {"digits": 3, "loss": "full"}},
        "train": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 2, "eval_interval": STEPS, "eval_batches": 1,
                  "log_interval": 1, "sample_tokens": 0, **train},
        "checkpoint": {"interval": SAVED, "keep_last": 10},
        "parallel": parallel})


def _train(rank, world, run_dir, parallel, train, resume):
    from longtrain.trainer.loop import train as train_loop

    return train_loop(_recipe(run_dir, parallel, train), resume=resume)


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _switch(tmp_path, before, after):
    """(records of the straight run at layout `before`, records of the run switched to `after` at SAVED)."""
    (parallel_a, train_a, world_a), (parallel_b, train_b, world_b) = before, after
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    run_ranks(_train, world_a, args=(straight, parallel_a, train_a, None), deepspeed=True)
    (switched / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / f"step_{SAVED:08d}", switched / "checkpoints" / f"step_{SAVED:08d}")
    run_ranks(_train, world_b, args=(switched, parallel_b, train_b, "auto"), deepspeed=True)
    return _records(straight), _records(switched)


def _assert_continues(straight, switched):
    want = {r["step"]: r for r in straight if r["step"] > SAVED and "loss" in r}
    got = {r["step"]: r for r in switched if "loss" in r}
    assert sorted(got) == sorted(want) == list(range(SAVED + 1, STEPS + 1))
    for step, record in got.items():
        assert abs(record["loss"] - want[step]["loss"]) <= 1e-5 * abs(want[step]["loss"]), (step, record, want[step])
        assert record["consumed_samples"] == want[step]["consumed_samples"]
    final = [r for r in switched if "final_eval_loss" in r][0]["final_eval_loss"]
    final_want = [r for r in straight if "final_eval_loss" in r][0]["final_eval_loss"]
    assert abs(final - final_want) <= 1e-5 * abs(final_want)


DP2 = ({"zero_stage": 1}, {"micro_batch_size": 2, "grad_accum": 2}, 2)
DP1 = ({}, {"micro_batch_size": 2, "grad_accum": 4}, 1)
ONE = ({}, {"micro_batch_size": 4, "grad_accum": 2}, 1)
TP2PP2 = ({"tp": 2, "pp": 2, "micro_batches": 2}, {"micro_batch_size": 4, "grad_accum": 2}, 4)
TP2 = ({"tp": 2}, {"micro_batch_size": 4, "grad_accum": 2}, 2)


def test_save_at_dp2_zero1_load_at_dp1(tmp_path):
    _assert_continues(*_switch(tmp_path, DP2, DP1))


def test_save_at_tp2_load_at_one_process(tmp_path):
    _assert_continues(*_switch(tmp_path, TP2, ONE))
    # `longtrain ckpt convert` assembles the tp=2 checkpoint's slices into the dense model: it equals the
    # weights the one-process continuation saved at the same step (to float32 reordering of the sums)
    from safetensors.torch import load_file
    import torch
    from conftest import run_cli
    out = tmp_path / "model.safetensors"
    run_cli("ckpt", "convert", tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}", out, check=True)
    weights = load_file(str(out))
    one = torch.load(tmp_path / "switched" / "checkpoints" / f"step_{STEPS:08d}" / "rank00000.pt", weights_only=True)["model"]
    assert weights.keys() == one.keys()
    for name, tensor in one.items():
        assert ((weights[name] - tensor).norm() / tensor.norm()) < 1e-5, name


@pytest.mark.slow
def test_save_at_tp2_pp2_load_at_tp1_pp1(tmp_path):
    _assert_continues(*_switch(tmp_path, TP2PP2, ONE))


@pytest.mark.slow
def test_save_at_tp1_pp1_load_at_tp2_pp2(tmp_path):
    _assert_continues(*_switch(tmp_path, ONE, TP2PP2))


DP2_ZERO3 = ({"zero_stage": 3}, {"micro_batch_size": 2, "grad_accum": 2}, 2)
CP2_ZERO2 = ({"cp": 2, "zero_stage": 2}, {"micro_batch_size": 2, "grad_accum": 4}, 2)


@pytest.mark.slow
def test_save_at_dp2_zero3_load_at_cp2_zero2(tmp_path):
    _assert_continues(*_switch(tmp_path, DP2_ZERO3, CP2_ZERO2))
