"""Context extension end to end (slow): recipes/passkey.yaml trains at 128 tokens, recipes/passkey-extend.yaml
takes its weights to 1024 tokens with YaRN (model.init_from), and the extended model finds the passkey at the
new length while keeping the old one."""
import json

import pytest

from tests.conftest import REPO, run_cli


@pytest.mark.slow
def test_yarn_extension_finds_passkeys_at_8x_and_keeps_the_original_length(tmp_path):
    source, extended = tmp_path / "passkey", tmp_path / "passkey-extend"
    run_cli("train", REPO / "recipes" / "passkey.yaml", f"run.dir={source}", timeout=2400, check=True)
    run_cli("train", REPO / "recipes" / "passkey-extend.yaml", f"model.init_from={source}", f"run.dir={extended}",
            timeout=1800, check=True)
    run_cli("eval", extended, "--task", "passkey", "--lengths", "128,1024", "--samples", "128", timeout=900, check=True)
    results = json.loads((extended / "eval" / "passkey.json").read_text())["lengths"]
    at_128, at_1024 = results["128"]["sample_accuracy"], results["1024"]["sample_accuracy"]
    assert at_128 >= 0.95, results  # the source's own length is kept (the source: 95.3% at step 2000)
    assert at_1024 >= 0.90, results  # measured 95.3% of 64 keys; the source finds none at 1024
