"""Shared test fixtures: a tiny recipe that trains in seconds on CPU, and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tiny_recipe(run_dir: Path, **sections) -> dict:
    """A recipe dict for a ~60k-parameter AMOF model on 300 kB of stdlib sources."""
    recipe = {
        "name": "tiny",
        "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 512,
                  "d_state": 4, "ode": {"solver": "rk4", "steps": 2}},
        "data": {"corpus": ["stdlib"], "max_bytes": 300_000, "seq_len": 32, "tokenizer": {"vocab_size": 512}},
        "train": {"steps": 12, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 4,
                  "eval_batches": 2, "log_interval": 2, "sample_tokens": 8, "threads": 1},
        "checkpoint": {"interval": 4, "keep_last": 3},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, timeout=300, check=False, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}  # a fresh one-process run
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "longtrain.launch.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"longtrain {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny(tmp_path):
    """(recipe dict, path of its YAML file) for a tiny run under tmp_path."""
    recipe = tiny_recipe(tmp_path / "run")
    return recipe, write_recipe(tmp_path / "tiny.yaml", recipe)


@pytest.fixture(scope="module")
def restore_environment():
    """In-process runs set torchrun's variables (RANK, MASTER_PORT, ...) for their one-process group, which
    stays for the session (DeepSpeed keeps its handle); later tests and CLI runs must not inherit them. A
    module that trains in-process uses it for all its tests: pytestmark = pytest.mark.usefixtures(...)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def assert_recipe_refused(raw: dict, words: list[str]) -> None:
    """Loading the recipe dict `raw` fails with a one-line message holding every one of `words`."""
    from longtrain.trainer.config import recipe_from_dict

    with pytest.raises(Exception) as error:
        recipe_from_dict(raw)
    message = str(error.value)
    assert "\n" not in message.strip() and all(w in message for w in words), message
