"""Every collective carries its tensor on the device a NCCL run needs it on, checked on this CPU.

NCCL refuses host tensors; gloo takes anything, so a gloo run cannot fail where a GPU run stops at step 1
(a stop flag, a resume path decision or a gradient norm made with `torch.tensor(...)` on the host and
all-reduced over a NCCL group). `HostTensorCheck` (trainer/parallel/collectives.py) runs the training
loop on gloo as a NCCL run would place its tensors, and raises on any collective whose tensor would be
on the host, except on the control group (gloo beside NCCL). Checked: the loop at dp=2 (the stop flag,
the loss average, the non-finite-gradient agreement), a resume at dp=2 (the path decision), pp=2 (the
pipeline's gradient norm), tp=2 (the vocab-parallel loss) and cp=2 (ring attention), and the rule itself
on a hand-made collective. Also: no module in trainer/ calls torch.distributed's collectives directly.
"""
import json
import re
from pathlib import Path

import pytest

from parallel_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


def _recipe(run_dir, steps=STEPS, **parallel):
    from longtrain.trainer.config import recipe_from_dict

    return recipe_from_dict({
        "name": "devices", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1}},
        "data": {"task": "passkey", "seq_len": 32, "passkey": {"digits": 3}},
        "train": {"steps": steps, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_interval": steps,
                  "eval_batches": 1, "log_interval": 1, "sample_tokens": 0},
        "checkpoint": {"interval": 2, "keep_last": 1},
        "parallel": parallel})


def _train_checked(rank, world, run_dir, parallel, steps, resume):
    from longtrain.trainer.loop import train
    from longtrain.trainer.parallel.collectives import HostTensorCheck

    with HostTensorCheck():
        return train(_recipe(run_dir, steps, **parallel), resume=resume)["step"]


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", [{}, {"pp": 2, "micro_batches": 2}, pytest.param({"tp": 2}, marks=pytest.mark.slow),
                                      pytest.param({"cp": 2}, marks=pytest.mark.slow)],
                         ids=["dp2", "pp2", "tp2", "cp2"])
def test_training_loop_sends_no_host_tensor_over_a_compute_group(parallel, tmp_path):
    assert run_ranks(_train_checked, 2, args=(tmp_path, parallel, STEPS, None), deepspeed=True) == [STEPS, STEPS]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == STEPS
    for record in logged:  # each rank's peak memory, gathered over the control group
        assert len(record["peak_memory_bytes_per_rank"]) == 2 and min(record["peak_memory_bytes_per_rank"]) > 0
        assert record["peak_memory_bytes"] == max(record["peak_memory_bytes_per_rank"])


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_decides_its_path_on_the_control_group(tmp_path):
    run_ranks(_train_checked, 2, args=(tmp_path, {}, 2, None), deepspeed=True)
    assert run_ranks(_train_checked, 2, args=(tmp_path, {}, 4, "auto"), deepspeed=True) == [4, 4]


def _collective_outcomes(rank, world):
    import torch
    import torch.distributed as dist

    from longtrain.trainer.parallel import collectives
    from longtrain.trainer.parallel.collectives import HostTensorCheck, PlacementError

    outcomes = {}
    with HostTensorCheck():
        collectives.init_control_group()  # apart from the default group, as beside NCCL
        device = torch.device("cpu")
        cases = {"host tensor": lambda: torch.tensor([1.0]),
                 "placed tensor": lambda: torch.tensor([1.0], device=device),
                 "moved tensor": lambda: torch.tensor([1.0]).to(device),
                 "derived from the host only": lambda: torch.tensor([1.0]) * 2,
                 "mixed with a placed tensor": lambda: torch.tensor([1.0]) * torch.ones(1, device=device)}
        for name, make in cases.items():
            try:
                dist.all_reduce(make())
                outcomes[name] = "sent"
            except PlacementError:
                outcomes[name] = "refused"
        outcomes["agree_any"] = collectives.agree_any(rank == 1)  # host tensors on the control group: allowed
    return outcomes


@pytest.mark.distributed
def test_the_rule_refuses_host_tensors_and_lets_control_values_through():
    for outcomes in run_ranks(_collective_outcomes, 2, deepspeed=True):
        assert outcomes == {"host tensor": "refused", "placed tensor": "sent", "moved tensor": "sent",
                            "derived from the host only": "refused", "mixed with a placed tensor": "sent",
                            "agree_any": True}


def test_trainer_calls_collectives_through_one_module():
    from longtrain.trainer.faults import COLLECTIVES, POINT_TO_POINT

    call = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(COLLECTIVES + POINT_TO_POINT) + r")\(")
    allowed = {ROOT / "trainer" / "parallel" / "collectives.py", ROOT / "trainer" / "faults.py"}
    direct = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "trainer").rglob("*.py")) if path not in allowed
              for n, line in enumerate(path.read_text().splitlines(), 1) if call.search(line)]
    assert not direct, direct
