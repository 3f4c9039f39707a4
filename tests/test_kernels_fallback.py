"""Without the compiled extension the package still imports and dispatch moves on, warning once.

Runs in a subprocess whose `longtrain.kernels._C` import is blocked (sys.modules entry None, which
makes `import` raise ImportError), as on a machine where the extension failed to build.
"""
import json
import subprocess
import sys

SCRIPT = r"""
import json, sys, warnings
sys.modules["longtrain.kernels._C"] = None
warnings.simplefilter("always")
import torch
from longtrain.kernels import attention as attention_module, scan as scan_module
from longtrain.kernels.registry import BackendError

cpu, report = torch.device("cpu"), {}
with warnings.catch_warnings(record=True) as caught:
    q, k, v = (torch.randn(1, 33, 4, 16) for _ in range(3))
    out = attention_module.attention(q, k, v, causal=True)
    out_lse, lse = attention_module.attention(q, k, v, causal=True, return_lse=True)
    expected, expected_lse = attention_module.reference(q, k, v, causal=True)
    u, delta = torch.randn(2, 3, 20), torch.rand(2, 3, 20)
    A, B, C = -torch.rand(3, 4), torch.randn(2, 4, 20), torch.randn(2, 4, 20)
    y, last = scan_module.selective_scan(u, delta, A, B, C, return_last_state=True)
    y_ref, last_ref = scan_module.reference(u, delta, A, B, C)
report["attention_backend"] = attention_module.registry.select(None, cpu, torch.float32).name
report["attention_lse_backend"] = attention_module.registry.select(None, cpu, torch.float32, need_lse=True).name
report["scan_backend"] = scan_module.registry.select(None, cpu, torch.float32).name
report["attention_error"] = (out - expected).abs().max().item()
report["lse_error"] = (lse - expected_lse).abs().max().item() + (out_lse - expected).abs().max().item()
report["scan_error"] = (y - y_ref).abs().max().item() + (last - last_ref).abs().max().item()
report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
try:
    scan_module.selective_scan(u, delta, A, B, C, backend="csrc")
    report["named_csrc"] = "no error"
except BackendError as error:
    report["named_csrc"] = str(error)
print(json.dumps(report))
"""


def test_dispatch_without_extension():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attention_backend"] == "torch"
    assert report["attention_lse_backend"] == "reference"
    assert report["scan_backend"] == "reference"
    assert report["attention_error"] < 1e-5 and report["lse_error"] < 1e-5 and report["scan_error"] < 1e-5
    assert len(report["warnings"]) == 1 and "longtrain.kernels._C could not be loaded" in report["warnings"][0]
    assert "not loaded" in report["named_csrc"] and "valid choices here: auto, reference" in report["named_csrc"]
