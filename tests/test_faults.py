"""Faults of a training run: a step with NaN or Inf gradients is skipped (parameters, Adam moments and
the schedule stay bitwise where they were) and counted, K in a row checkpoint and stop the run; a
collective whose peer hangs fails in one line naming the rank and the op."""
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_recipe, write_recipe
from parallel_harness import _free_port, run_ranks


pytestmark = pytest.mark.usefixtures("restore_environment")  # conftest.py


def _poisoned_loss(bad_steps: dict):
    """The loop's train_loss, times bad_steps[step] (NaN or Inf: every gradient non-finite) at those
    train steps (one micro-batch per step)."""
    from longtrain.trainer.loop import train_loss as clean

    calls = [0]

    def train_loss(engine, inputs, targets, *positions):
        loss = clean(engine, inputs, targets, *positions)
        calls[0] += 1
        return loss * bad_steps[calls[0]] if calls[0] in bad_steps else loss
    return train_loss


def _recipe(run_dir, **sections):
    from longtrain.trainer.config import recipe_from_dict

    recipe = tiny_recipe(run_dir, **sections)
    recipe["train"] = {**recipe["train"], "sample_tokens": 0, **sections.get("train", {})}
    return recipe_from_dict(recipe)


def _state(run_dir, step, rank=0) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / f"rank{rank:05d}.pt", weights_only=True)


def _tensors(tree, prefix="") -> dict:
    """Every tensor in a nested dict / list, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in _tensors(value, f"{prefix}/{key}").items()}


def _changed(a: dict, b: dict) -> set:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_nonfinite_step_is_skipped_and_training_continues(tmp_path, monkeypatch, capsys):
    from longtrain.trainer import loop
    from longtrain.trainer.loop import train

    monkeypatch.setattr(loop, "train_loss", _poisoned_loss({3: float("nan")}))
    run_dir = tmp_path / "run"
    train(_recipe(run_dir, train={"steps": 5, "eval_interval": 5, "log_interval": 2},
                  checkpoint={"interval": 1, "keep_last": 5}))
    states = {step: _state(run_dir, step) for step in range(1, 6)}
    model = {step: _tensors(s["model"]) for step, s in states.items()}
    moments = {step: _tensors(s["optimizer"]["state"]) for step, s in states.items()}
    assert any("exp_avg_sq" in k for k in moments[3]) and any("exp_avg" in k for k in moments[3])

    # step 3 changed nothing: parameters, both moments and Adam's step count are those of step 2
    assert _changed(model[2], model[3]) == set() and _changed(moments[2], moments[3]) == set()
    assert all(float(s["step"]) == 2 for s in states[3]["optimizer"]["state"].values())
    assert states[3]["scheduler"]["last_epoch"] == states[2]["scheduler"]["last_epoch"] == 2
    # ... while the loader moved past its batch and step 4 trains every parameter step 2 trained
    assert states[3]["loader"] != states[2]["loader"]
    assert _changed(model[3], model[4]) == _changed(model[1], model[2]) != set()
    assert all(float(s["step"]) == 3 for s in states[4]["optimizer"]["state"].values())

    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(records) == [2, 3, 4, 5]  # log_interval 2, plus the skipped step
    assert records[3]["skipped"] is True and records[3]["skipped_steps"] == 1 and math.isnan(records[3]["loss"])
    assert records[3]["lr"] == records[2]["lr"]  # the schedule did not advance
    for step in (2, 4, 5):
        assert records[step]["skipped"] is False and math.isfinite(records[step]["loss"])
    assert [records[s]["skipped_steps"] for s in (2, 4, 5)] == [0, 1, 1]
    assert "step      3/5 | NaN or Inf gradients (loss nan): update skipped, 1 in a row" in capsys.readouterr().out


def test_infinite_loss_with_finite_gradients_is_skipped(tmp_path, monkeypatch):
    """loss + inf: the loss is infinite but its gradients are finite; the step is still dropped."""
    from longtrain.trainer import loop
    from longtrain.trainer.loop import train
    from longtrain.trainer.loop import train_loss as clean

    calls = [0]

    def train_loss(engine, inputs, targets, *positions):
        loss = clean(engine, inputs, targets, *positions)
        calls[0] += 1
        return loss + float("inf") if calls[0] == 2 else loss
    monkeypatch.setattr(loop, "train_loss", train_loss)
    run_dir = tmp_path / "run"
    train(_recipe(run_dir, train={"steps": 3, "eval_interval": 3, "log_interval": 1},
                  checkpoint={"interval": 1, "keep_last": 3}))
    states = {step: _state(run_dir, step) for step in (1, 2, 3)}
    assert _changed(_tensors(states[1]["model"]), _tensors(states[2]["model"])) == set()
    assert _changed(_tensors(states[2]["model"]), _tensors(states[3]["model"])) != set()
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert records[2]["skipped"] is True and records[2]["loss"] == float("inf") and records[3]["skipped"] is False


def test_consecutive_nonfinite_steps_checkpoint_and_stop(tmp_path, monkeypatch):
    from longtrain.trainer.checkpoint import verify
    from longtrain.trainer import loop
    from longtrain.trainer.errors import LongtrainError
    from longtrain.trainer.loop import train

    # 2 then 3 is fine again, 4 and 5 make two in a row: the run stops at step 5
    monkeypatch.setattr(loop, "train_loss", _poisoned_loss({2: float("inf"), 4: float("nan"), 5: float("inf")}))
    run_dir = tmp_path / "run"
    recipe = _recipe(run_dir, train={"steps": 8, "eval_interval": 8, "max_nonfinite_steps": 2},
                     checkpoint={"interval": 3, "keep_last": 5})
    with pytest.raises(LongtrainError) as stopped:
        train(recipe)
    path = run_dir / "checkpoints" / "step_00000005"
    message = str(stopped.value)
    assert message.startswith("step 5: 2 steps in a row had NaN or Inf gradients") and str(path) in message
    assert "\n" not in message
    assert verify(path)["step"] == 5
    at_3, at_5 = _state(run_dir, 3), _state(run_dir, 5)
    assert _changed(_tensors(at_3["model"]), _tensors(at_5["model"])) == set()
    assert _changed(_tensors(at_3["optimizer"]["state"]), _tensors(at_5["optimizer"]["state"])) == set()
    assert at_5["loader"]["consumed_samples"] == 5 * 4  # past the bad batches: a resume trains on new data
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records if r["skipped"]] == [2, 4, 5] and records[-1]["skipped_steps"] == 3

    monkeypatch.undo()
    final = train(recipe, resume="auto")
    assert final["step"] == 8 and math.isfinite(final["final_loss"])


def test_max_nonfinite_steps_must_be_positive(tmp_path):
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.errors import LongtrainError

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    with pytest.raises(LongtrainError, match=r"train\.max_nonfinite_steps: Input should be greater than or equal to 1"):
        load_recipe(path, ["train.max_nonfinite_steps=0"])
    with pytest.raises(LongtrainError, match=r"parallel\.collective_timeout_s: Input should be greater than 0"):
        load_recipe(path, ["parallel.collective_timeout_s=0"])


def _train_one_rank_poisoned(rank, world, run_dir, bad_rank, bad_step, zero_stage):
    from longtrain.trainer import loop

    loop.train_loss = _poisoned_loss({bad_step: float("nan")} if rank == bad_rank else {})
    skipped = []
    loop.train(_recipe(run_dir, train={"steps": 4, "eval_interval": 4, "log_interval": 1},
                  checkpoint={"interval": 1, "keep_last": 4}, parallel={"zero_stage": zero_stage}),
          on_step=lambda step, metrics, checkpoint: skipped.append(metrics["skipped"]))
    return skipped


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_ranks_skip_together_when_one_rank_is_nonfinite(tmp_path, zero_stage):
    """dp=2: only rank 1's loss is NaN at step 2; both ranks skip it and their parameters stay equal
    (ZeRO 0: SkippingAdamW's flag, reduced over the ranks; ZeRO 1: DeepSpeed's own NaN-norm check)."""
    skipped = run_ranks(_train_one_rank_poisoned, 2, args=(tmp_path, 1, 2, zero_stage), deepspeed=True)
    assert skipped == [[False, True, False, False]] * 2
    model = {(step, rank): _tensors(_state(tmp_path, step, rank)["model"]) for step in range(1, 5) for rank in (0, 1)}
    for step in range(1, 5):
        assert _changed(model[step, 0], model[step, 1]) == set()
    assert _changed(model[1, 0], model[2, 0]) == set()
    assert _changed(model[2, 0], model[3, 0]) != set()
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1] and math.isfinite(records[-1]["loss"])


@pytest.mark.distributed
@pytest.mark.parametrize("signal_name, failure", [("SIGSTOP", "timed out after 10 s"), ("SIGKILL", "lost its peer")])
def test_hung_or_dead_peer_fails_a_collective_in_one_line(tmp_path, signal_name, failure):
    """Two `longtrain train` processes (dp=2); rank 1 is stopped (hung) or killed (dead) once a step is
    logged. Rank 0 exits within the collective timeout with one line naming itself, the op, its ranks
    and the step, and no traceback."""
    timeout_s = 10
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "run"))
    command = [sys.executable, "-m", "longtrain.launch.cli", "train", str(recipe), "train.steps=1000",
               "train.log_interval=1", "train.eval_interval=1000", "checkpoint.interval=1000",
               f"parallel.collective_timeout_s={timeout_s}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    stderr = [open(tmp_path / f"stderr{rank}.txt", "w+") for rank in (0, 1)]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                              stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=stderr[rank])
             for rank in (0, 1)]
    try:
        for line in ranks[0].stdout:  # rank 0 prints the progress lines
            if line.startswith("step      1/1000 | loss"):
                break
        os.kill(ranks[1].pid, getattr(signal, signal_name))
        stopped = time.monotonic()
        ranks[0].communicate(timeout=timeout_s + 40)
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()  # SIGKILL also ends a stopped process
            process.wait()
        for file in stderr:
            file.close()
    text = (tmp_path / "stderr0.txt").read_text()
    errors = [line for line in text.splitlines() if line.startswith("longtrain: error:")]
    assert ranks[0].returncode == 2, text
    assert waited <= timeout_s + 30, (waited, text)
    if signal_name == "SIGSTOP":  # the collective's timeout, counted from when rank 0 entered it
        assert waited >= timeout_s - 1, (waited, text)
    assert len(errors) == 1 and "Traceback" not in text, text
    why = "a peer rank is hung or dead" if signal_name == "SIGSTOP" else "a peer rank died or left"
    op = r"(all_reduce|all_gather|broadcast|barrier|reduce_scatter)\w*"
    assert re.fullmatch(rf"longtrain: error: rank 0: {op} over ranks \[0, 1\] {failure} during "
                        rf"(the end of )?train step \d+ — {why}", errors[0]), errors[0]


def _wait_on_silent_peer(rank, port, out_dir):
    import datetime

    import torch.distributed as dist

    from longtrain.trainer.errors import LongtrainError
    from longtrain.trainer.faults import named_failures, watch_collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    watch = watch_collectives(timeout_s=3)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    watch.phase = "the test"
    dist.all_reduce(torch.ones(1))  # issued and finished on both ranks: not the op that fails
    if rank == 1:
        time.sleep(6)  # never sends, and stays alive until rank 0 has timed out
        os._exit(0)
    work, = dist.batch_isend_irecv([dist.P2POp(dist.irecv, torch.zeros(1), 1)])  # as the context-parallel ring
    try:
        with named_failures(watch):
            work.wait()  # raises outside any wrapper
    except LongtrainError as error:
        (Path(out_dir) / "message.txt").write_text(str(error))
    os._exit(0)  # gloo closes the pair after a timeout: the group cannot be torn down in order


@pytest.mark.distributed
def test_async_wait_timeout_is_named_by_the_last_op_issued(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_wait_on_silent_peer, args=(_free_port(), tmp_path), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "message.txt").read_text() == (
        "rank 0: a collective timed out after 3 s during the test (the last one this rank issued: batch_isend_irecv "
        "with ranks [1])"
        " — a peer rank is hung or dead")
