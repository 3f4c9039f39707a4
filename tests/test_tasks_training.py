"""The shipped passkey and MQAR recipes train tiny models on CPU to solve their tasks at the training length."""
import json

import pytest

from tests.conftest import REPO, run_cli


@pytest.mark.slow
def test_passkey_recipe_reaches_95_percent(tmp_path):
    run = tmp_path / "passkey"
    run_cli("train", REPO / "recipes" / "passkey.yaml", f"run.dir={run}", timeout=1800, check=True)
    run_cli("eval", run, "--lengths", "1x,2x,4x", "--samples", "128", timeout=600, check=True)
    results = json.loads((run / "eval" / "passkey.json").read_text())
    train_length = str(results["train_length"])
    assert results["lengths"][train_length]["sample_accuracy"] >= 0.95
    assert len(results["lengths"]) == 3


@pytest.mark.slow
def test_mqar_recipe_recalls_90_percent(tmp_path):
    run = tmp_path / "mqar"
    run_cli("train", REPO / "recipes" / "mqar.yaml", f"run.dir={run}", timeout=1800, check=True)
    run_cli("eval", run, "--lengths", "1x,2x", "--samples", "128", timeout=600, check=True)
    results = json.loads((run / "eval" / "mqar.json").read_text())
    assert results["lengths"][str(results["train_length"])]["token_accuracy"] >= 0.90
    assert len(results["lengths"]) == 2
