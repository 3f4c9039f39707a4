"""`longtrain eval`, `generate` and `report` on a tiny passkey run; lengths; loss by position."""
import json
import math

import numpy as np
import pytest
import torch

from longtrain.launch.cli import main
from longtrain.trainer.config import ModelConfig
from longtrain.trainer.data.loader import PackedDataset, eval_batches
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.eval import loss_by_position, parse_lengths
from longtrain.trainer.model.decoder import Decoder, lm_loss
from tests.conftest import read_metrics, run_cli, tiny_recipe, write_recipe


def test_parse_lengths():
    assert parse_lengths("1x,2x,4x", 256) == [256, 512, 1024]
    assert parse_lengths("256, 512,1024", 99) == [256, 512, 1024]
    assert parse_lengths("4k,0.5x", 100) == [4096, 50]
    assert parse_lengths(None, 64) == [64]
    with pytest.raises(LongtrainError, match="--lengths"):
        parse_lengths("4q", 64)


def test_loss_by_position_matches_the_mean_loss():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(pattern="AF", d_model=32, n_heads=2, n_kv_heads=1, vocab_size=50)).eval()
    dataset = PackedDataset(np.random.default_rng(0).integers(0, 50, 2000), 40)
    result = loss_by_position(model, eval_batches(dataset, 4, 3))
    with torch.no_grad():
        expected = np.mean([lm_loss(model(x), y).item() for x, y in eval_batches(dataset, 4, 3)])
    assert result["tokens"] == 3 * 4 * 40
    assert math.isclose(result["loss"], expected, rel_tol=1e-5)
    curve = result["loss_by_position"]
    assert len(curve["position"]) == len(curve["loss"]) == 40
    assert math.isclose(np.mean(curve["loss"]), expected, rel_tol=1e-5)


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey")
    recipe = tiny_recipe(root / "run", model={"pattern": "AMF", "vocab_size": 32},
                         data={"task": "passkey", "seq_len": 32, "passkey": {"digits": 3}},
                         train={"steps": 4, "eval_interval": 2, "sample_tokens": 3},
                         checkpoint={"interval": 4, "keep_last": 1})
    del recipe["data"]["corpus"], recipe["data"]["max_bytes"], recipe["data"]["tokenizer"]
    run_cli("train", write_recipe(root / "passkey.yaml", recipe), check=True)
    return root / "run"


def test_train_on_passkey_logs_accuracy(passkey_run):
    records = read_metrics(passkey_run)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4]
    assert "answer" in (passkey_run / "sample.txt").read_text()


def test_eval_passkey_and_perplexity(passkey_run, capsys):
    assert main(["eval", str(passkey_run), "--lengths", "1x,2x", "--samples", "8", "--threads", "1"]) == 0
    results = json.loads((passkey_run / "eval" / "passkey.json").read_text())
    assert results["train_length"] == 32 and list(results["lengths"]) == ["32", "64"]
    entry = results["lengths"]["64"]
    assert entry["samples"] == 8 and 0 <= entry["sample_accuracy"] <= 1 and len(entry["by_depth"]) == 5
    assert (passkey_run / "eval" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "(   2x)" in capsys.readouterr().out
    assert main(["eval", str(passkey_run / "checkpoints" / "latest"), "--task", "perplexity", "--lengths", "32",
                 "--samples", "8"]) == 0
    results = json.loads((passkey_run / "eval" / "perplexity.json").read_text())
    assert results["lengths"]["32"]["tokens"] == 8 * 3  # answer tokens only: the run's loss
    assert (passkey_run / "eval" / "perplexity.png").is_file()


def test_generate_and_report(passkey_run, capsys):
    assert main(["generate", str(passkey_run), "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["new_ids"]) == 3 and len(out["text"].split()) == 3
    assert main(["generate", str(passkey_run), "--prompt", "<bos> <key> 1 2 3 </key> <query>",
                 "--max-new-tokens", "2", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["generate", str(passkey_run), "--prompt", "nope"]) == 2
    assert main(["report", str(passkey_run)]) == 0
    assert (passkey_run / "plots" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_text_perplexity_by_length(tmp_path):
    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.data.shards import prepare
    from longtrain.trainer.eval import evaluate, plot_results

    recipe = recipe_from_dict({"run": {"dir": str(tmp_path)}, "model": {"pattern": "MF", "d_model": 32, "n_heads": 2,
                               "n_kv_heads": 1, "vocab_size": 512},
                               "data": {"corpus": ["stdlib"], "max_bytes": 120_000, "seq_len": 32,
                                        "tokenizer": {"vocab_size": 512}}})
    prepare(recipe.data, tmp_path / "data")
    torch.manual_seed(0)
    model = Decoder(recipe.model).eval()
    results = evaluate(model, recipe, tmp_path, "perplexity", [32, 64], samples=4, batch_size=2)
    for length in (32, 64):
        entry = results["lengths"][length]
        assert entry["tokens"] == 4 * length
        assert abs(entry["loss"] - math.log(512)) < 1.0  # an untrained model is near uniform
    plot_results(results, tmp_path / "perplexity.png")
    assert (tmp_path / "perplexity.png").stat().st_size > 10_000


def test_mqar_accuracy_by_length(tmp_path):
    from longtrain.trainer.config import recipe_from_dict
    from longtrain.trainer.eval import evaluate, write_results

    recipe = recipe_from_dict({"model": {"pattern": "AF", "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                         "vocab_size": 21},
                               "data": {"task": "mqar", "seq_len": 32, "mqar": {"pairs": 4, "keys": 10, "values": 10}}})
    torch.manual_seed(0)
    results = evaluate(Decoder(recipe.model).eval(), recipe, tmp_path, "mqar", [32, 64], samples=8, batch_size=4)
    for length in (32, 64):
        entry = results["lengths"][length]
        assert entry["samples"] == 8 and 0 <= entry["token_accuracy"] <= 1
    json_path, png_path = write_results(results, tmp_path / "eval")
    assert json.loads(json_path.read_text())["task"] == "mqar" and png_path.stat().st_size > 10_000
    with pytest.raises(LongtrainError, match="model.vocab_size=21"):
        evaluate(Decoder(recipe.model), recipe, tmp_path, "passkey", [32])
