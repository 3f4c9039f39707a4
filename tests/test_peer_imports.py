"""The repository's folders never shadow Hugging Face's `kernels` package, which transformers imports.

The top-level `kernels/` folder is on sys.path wherever a command runs from the checkout's root
(`python -m pytest`, `python -c`), and every file in `bench/` is importable by the bench scripts.
transformers 5.x then failed on `from transformers import LlamaForCausalLM` ("cannot import name
'CUDAProperties' from 'kernels'"), and the peer rows of bench/train_throughput.py with it.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_imports_with_the_checkout_root_first_on_sys_path():
    code = ("import sys; sys.path.insert(0, ''); from transformers import LlamaForCausalLM; import kernels, longtrain.kernels; "
            "print(kernels.__file__); print(longtrain.kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf_kernels, ours = proc.stdout.split()
    assert not Path(hf_kernels).is_relative_to(ROOT), hf_kernels  # Hugging Face's package, not our folder
    assert Path(ours) == ROOT / "kernels" / "__init__.py"


def test_bench_peer_row_runs(tmp_path):
    """One transformers peer row of the throughput bench, run as a script from the checkout as documented."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--models", "transformers Llama,longtrain A",
                           "--seq-lens", "64", "--steps", "1", "--precisions", "fp32", "--d-model", "32", "--heads", "2",
                           "--kv-heads", "1", "--vocab", "64", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"transformers Llama", "longtrain A"}
    for model, row in rows.items():
        assert "error" not in row, (model, row)
        assert row["tokens_per_s"] > 0
