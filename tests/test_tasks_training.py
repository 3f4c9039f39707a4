"""The shipped passkey recipe trains a tiny model on CPU to >= 95% retrieval at its training length."""
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
