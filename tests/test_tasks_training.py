"""The shipped passkey and MQAR recipes train tiny models on CPU to solve their tasks at the training length."""
import json

import pytest

from tests.conftest import REPO, run_cli


def train_and_eval(tmp_path, task: str, lengths: str) -> tuple[dict, dict]:
    """Trains recipes/<task>.yaml, evaluates it at `lengths`; (all results, those at the training length)."""
    run = tmp_path / task
    run_cli("train", REPO / "recipes" / f"{task}.yaml", f"run.dir={run}", timeout=1800, check=True)
    run_cli("eval", run, "--lengths", lengths, "--samples", "128", timeout=600, check=True)
    results = json.loads((run / "eval" / f"{task}.json").read_text())
    return results, results["lengths"][str(results["train_length"])]


@pytest.mark.slow
def test_passkey_recipe_reaches_95_percent(tmp_path):
    results, at_train_length = train_and_eval(tmp_path, "passkey", "1x,2x,4x")
    assert at_train_length["sample_accuracy"] >= 0.95
    assert len(results["lengths"]) == 3


@pytest.mark.slow
def test_mqar_recipe_recalls_90_percent(tmp_path):
    results, at_train_length = train_and_eval(tmp_path, "mqar", "1x,2x")
    assert at_train_length["token_accuracy"] >= 0.90
    assert len(results["lengths"]) == 2
