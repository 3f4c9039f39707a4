"""The CUDA kernels compile with nvcc for sm_80 and sm_90, on machines without a GPU too.

The .cu files include plain CUDA headers only (their torch bindings are .cpp files that need the
CUDA build of torch), so this check runs on a CPU-only torch install; about 30 s with nvcc 13.
"""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.relpath(s, ROOT) for s in SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    arches = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    command = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", *arches, source, "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr
