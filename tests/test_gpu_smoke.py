"""bench/gpu_smoke.sh --dry-run: every step of the first GPU check runs on the CPU with tiny sizes (the
machine report, the extension import, the CUDA test collection, the kernel bench and both training runs
with their summaries), so the script is ready when a GPU is."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_dry_run(tmp_path):
    env = {**os.environ, "SMOKE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("machine", "build the extension", "CUDA kernel tests", "kernel bench",
                    "train recipes/quickstart.yaml", "train recipes/gpu-smoke-hybrid.yaml"):
        assert f"== {heading}" in proc.stdout, heading
    assert proc.stdout.count("summary: step 2 |") == 2
    assert "csrc speed-up" in proc.stdout
    for run in ("quickstart", "hybrid"):
        assert (tmp_path / run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
