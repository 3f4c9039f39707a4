"""bench/train_throughput.py: a real (tiny) run end to end, and the ratio lines from known figures."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_rows_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--models", "longtrain A",
                           "--seq-lens", "64,128", "--steps", "1", "--precisions", "fp32,bf16", "--d-model", "32",
                           "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--json", str(out),
                           "--plot", str(tmp_path / "bench.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "measured matmul peak" in proc.stdout and "bf16" in proc.stdout
    data = json.loads(out.read_text())
    assert sorted((r["precision"], r["seq_len"]) for r in data["results"]) == [
        ("bf16", 64), ("bf16", 128), ("fp32", 64), ("fp32", 128)]
    rows = {r["precision"]: r for r in data["results"] if r["seq_len"] == 128}
    assert set(rows) == {"fp32", "bf16"} and set(data["peak_flops"]) == {"fp32", "bf16"}
    assert "MiB per 1k tokens" in proc.stdout
    from PIL import Image
    with Image.open(tmp_path / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000
    for precision, r in rows.items():
        assert "error" not in r, r
        assert r["tokens_per_s"] == r["seq_len"] / r["seconds_per_step"] > 0
        assert r["seconds_per_step"] == min(r["cpu_seconds"])
        assert abs(r["mfu"] - r["flops_per_token"] * r["tokens_per_s"] / data["peak_flops"][precision]) < 1e-9
        assert 0 < r["mfu"] < 1.5


def test_memory_growth_from_known_figures(capsys):
    bench = load_bench()
    mib = 2**20

    def row(model, seq_len, activation_mib):
        return {"model": model, "precision": "bf16", "seq_len": seq_len, "activation_bytes": activation_mib * mib}

    growth = bench.memory_growth([row("longtrain A", 1024, 50), row("longtrain A", 2048, 100), row("longtrain A", 4096, 200),
                                  row("transformers Llama", 2048, 100), row("transformers Llama", 4096, 400),
                                  {"model": "longtrain M", "precision": "bf16", "seq_len": 8192, "error": "over 300 s"}])
    slope, exponent, n0, n1 = growth[("longtrain A", "bf16")]
    assert (slope, exponent, n0, n1) == (50.0, 1.0, 2048, 4096)
    slope, exponent, _, _ = growth[("transformers Llama", "bf16")]
    assert slope == 150.0 and abs(exponent - 2.0) < 1e-12
    assert ("longtrain M", "bf16") not in growth
    bench.print_memory_growth([row("longtrain A", 1024, 50), row("longtrain A", 2048, 100)])
    assert "50.0 MiB per 1k tokens, k = 1.00" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_rate, expected", [(1e9, ["fp32"]), (1e12, ["bf16", "fp32"])])
def test_auto_precisions_leave_out_emulated_bf16(monkeypatch, capsys, tmp_path, bf16_rate, expected):
    bench = load_bench()
    monkeypatch.setattr(bench, "matmul_peak", lambda threads, precision="fp32": bf16_rate if precision == "bf16" else 5e10)
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "longtrain A", "--seq-lens", "32", "--steps", "1", "--d-model", "32", "--heads", "2",
                       "--kv-heads", "1", "--vocab", "64", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert sorted(r["precision"] for r in data["results"]) == expected
    assert sorted(data["peak_flops"]) == expected
    assert ("bf16 left out" in capsys.readouterr().out) == (expected == ["fp32"])


def test_ratio_lines(capsys):
    bench = load_bench()

    def row(model, precision, tokens_per_s):
        return {"model": model, "precision": precision, "seq_len": 4096, "tokens_per_s": tokens_per_s,
                "activation_bytes": 2**20}
    bench.print_ratios([row("longtrain A", "fp32", 2000.0), row("transformers Llama", "fp32", 1600.0),
                        row("longtrain A", "bf16", 3600.0), row("transformers Llama", "bf16", 2400.0)])
    lines = capsys.readouterr().out.splitlines()
    assert any("4096 fp32:  1.25x" in line for line in lines)
    assert any("4096 bf16:  1.50x" in line for line in lines)
    assert not any("best" in line for line in lines)  # both are fastest in bf16: the bf16 line says it

    bench.print_ratios([row("longtrain A", "bf16", 3000.0), row("transformers Llama", "fp32", 2000.0),
                        row("transformers Llama", "bf16", 1500.0)])
    best = [line for line in capsys.readouterr().out.splitlines() if "best" in line]
    assert len(best) == 1 and "1.50x" in best[0] and "(bf16 vs fp32" in best[0]


def test_layer_kernel_table_runs_both_backends(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernel_speed.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    kernels.layer_kernels(bandwidth=1e10, repeats=1, tokens=64, d_model=32, hidden=48, heads=2, vocab_chunk=(16, 50))
    out = capsys.readouterr().out
    from longtrain.kernels.extension import extension
    if extension() is None:
        assert "extension not built" in out
        return
    rows = [line for line in out.splitlines() if line.startswith(("float32 ", "bfloat16 "))]
    assert len(rows) == 8  # four ops, two dtypes
    for row in rows:  # two timings, then the ratio and the share of bandwidth (values vary with the machine)
        assert row.count(" ms") == 2 and row.rstrip().endswith("%"), row
        float([cell for cell in row.split() if cell.endswith("x")][-1][:-1])
