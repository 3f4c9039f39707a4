"""recipes/ode.yaml end to end: a shrunken copy trains through `longtrain train` (loss falls, the log
holds every O block's evaluation and step counts), and bad ODE settings are one-line errors."""
from __future__ import annotations

import pytest

from conftest import REPO, read_metrics, run_cli

from longtrain.trainer.config import load_recipe
from longtrain.trainer.errors import LongtrainError

RECIPE = REPO / "recipes" / "ode.yaml"
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=512",
        "data.tokenizer.vocab_size=512", "data.max_bytes=300000", "data.seq_len=32", "train.steps=30",
        "train.micro_batch_size=8", "train.warmup_steps=3", "train.eval_interval=10", "train.eval_batches=2",
        "train.log_interval=5", "train.sample_tokens=0", "train.threads=1", "checkpoint.interval=1000"]


def test_ode_recipe_trains_and_logs_step_counts(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", RECIPE, f"run.dir={run_dir}", *TINY, check=True)
    records = read_metrics(run_dir)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0] * 0.9, evals
    pattern = load_recipe(RECIPE).model.pattern
    layers = [i for i, letter in enumerate(pattern) if letter == "O"]
    for record in (r for r in records if "loss" in r):
        for i in layers:  # dopri5 with adjoint: both passes, and nfe = 2 + 6 x attempted steps
            for suffix in ("", "_backward"):
                steps, rejected = record[f"ode/{i}/steps{suffix}"], record[f"ode/{i}/rejected{suffix}"]
                assert steps >= 1 and record[f"ode/{i}/nfe{suffix}"] == 2 + 6 * (steps + rejected)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("model.ode.solver=foo", "model.ode.solver: Input should be 'euler', 'midpoint', 'rk4' or 'dopri5' (got 'foo')"),
    ("model.ode.rtol=-0.001", "model.ode.rtol: Input should be greater than 0 (got -0.001)"),
])
def test_bad_ode_settings_from_the_command_line(override, expected):
    quickstart = REPO / "recipes" / "quickstart.yaml"
    assert one_line_error(run_cli("train", quickstart, override)) == f"longtrain: error: {quickstart}: {expected}"


@pytest.mark.parametrize("override, field", [
    ("model.ode.atol=0", "model.ode.atol: Input should be greater than 0"),
    ("model.ode.rtol=-1.0e-3", "model.ode.rtol: Input should be greater than 0"),
    ("model.ode.max_steps=0", "model.ode.max_steps: Input should be greater than 0"),
    ("model.ode.steps=-2", "model.ode.steps: Input should be greater than 0"),
    ("model.ode.sublayer=conv", "model.ode.sublayer: Input should be 'mlp' or 'attention_mlp'"),
])
def test_bad_ode_settings_name_the_field(override, field):
    with pytest.raises(LongtrainError) as err:
        load_recipe(RECIPE, [override])
    assert field in str(err.value) and "\n" not in str(err.value)
